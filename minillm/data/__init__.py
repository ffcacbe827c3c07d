"""From the user's file to batches: reading and splitting (corpus), tokenizing into a run folder (prepare),
and batching the prepared splits (batches). The bundled Tiny Shakespeare text lives here too."""
