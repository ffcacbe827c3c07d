"""The serving core: what any server of Mini LLM models needs, whatever its front (the Gradio web UI in
minillm.ui, an HTTP API). Gradio-free, and it imports nothing of minillm.ui.

    access.py            what a server's users may name: training data (uploads, the bundled corpus, files
                         under --data-dir) and runs (a run folder or its files), checked after resolving links
    address.py           where a server listens: default host and ports, the --host/--port checks, the warning
                         for a network address
    limits.py            ServerLimits: what one client may ask for (new tokens, prompt length, generations at
                         once) and how many runs stay loaded; check_generation applies them to a request
    run_cache.py         RunCache: the loaded runs shared by every client, at most N, least recently used out;
                         ServedRun: one loaded run with its long-lived batch scheduler (its decode steps
                         compiled in the background when asked) and `stream`/`reply`, the one place a server
                         generates; RunKey, model_files
    sessions.py          Sessions: each client's Session (its claim on a run, its stop flag, its generations)
    training_manager.py  TrainingManager: one training at a time per server, in a background thread

The modules are imported by name (`from minillm.serve.run_cache import RunCache`): importing this package
alone loads none of them, so the CLI can read the defaults of address.py without loading the rest.
"""
