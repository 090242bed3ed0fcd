"""The job server (``python -m SFRSegmentLib serve``) and its client (``run/predict/jobs --server URL``).

* :mod:`.store`: the server's jobs on disk (job folders under ``DATA/jobs``, their states, uploads, result files);
* :mod:`.jobqueue`: the queue that runs the engine's own commands as child processes, a few at a time;
* :mod:`.app`: the HTTP API (FastAPI) with its token check; :mod:`.serve`: the token file, TLS and uvicorn;
* :mod:`.client`: the HTTP client (httpx); :mod:`.remote`: the command line's ``--server`` mode on top of it.

The server never imports torch: the engine runs in the child processes.
"""
