"""A third-party host that fails to import: quiesce must name it and carry on."""

raise ImportError("quiesce_brokenhost needs a module that is not installed")
