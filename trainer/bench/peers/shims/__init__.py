"""CPU launchers for the peers' trainers. Each file here runs with the *peer's* venv Python
(`python FILE ARGS...`), patches only what assumes a GPU - device selection, accelerator
synchronisation, GPU-only kernels - and then calls the peer's own entry point with ARGS.
No patch touches a peer's maths: model, loss, optimizer and schedule are the peer's."""
