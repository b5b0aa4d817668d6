raise ImportError("quiesce_broken needs a module that is not installed")
