"""Installation-time steps: patches to the installed vLLM, environment checks."""
