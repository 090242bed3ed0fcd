"""The base every other package stands on: the typed configuration and its JSON form, the lists of choices, errors
and exit codes, progress events, devices and torch.distributed helpers. Nothing here knows a stage or a model."""
