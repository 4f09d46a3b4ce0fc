"""What deployd knows about the tools components are built and run with (Python, Node.js).

Below both the pipeline (builds) and the runtime (step processes), so neither needs the other.
"""
