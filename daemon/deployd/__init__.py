"""deployd: git push → new component version → real-time flows republished."""
