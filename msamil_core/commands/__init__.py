"""One module per ``msamil`` sub-command (see :mod:`msamil_core.cli`)."""
