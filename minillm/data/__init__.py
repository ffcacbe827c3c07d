"""From the user's file to batches: reading and splitting (corpus), the task the data is for (tasks: text or
pairs, as a registry), what split.json records (split_record), token files (streams), a run's data read,
written and opened again (prepare), and batching the prepared splits (batches). The bundled Tiny
Shakespeare text lives here too."""
