"""Claims the kind 'sqlite', which the bundled adapter already owns."""
