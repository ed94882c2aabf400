"""One module per `hybridflow-mg` command; see `hybridflow_mg/cli.py`."""
