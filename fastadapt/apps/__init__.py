"""The applications built on the ops and the training layer: the CLI, the demo, the quick benchmark,
the end-to-end jobs, the dataset readers and the plots. Nothing in fastadapt.ops or
fastadapt.training imports from here."""
