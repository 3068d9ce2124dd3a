"""The ``slimstream`` command line: the top layer, one module per command group (see :mod:`cli.main`)."""
