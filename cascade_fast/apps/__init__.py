"""The applications around the connector: the ``cascade-fast`` command and its helpers.

- `cli`: argument parsing and dispatch of ``cascade-fast bench`` and ``cascade-fast watch``;
- `bench`: the fleet benchmark of the python and fast connectors;
- `watch`: a live view of a Cascade fleet on a broker;
- `mosquitto`: the one Mosquitto launcher, used by the bench, the tests, the
  tools and the benches.

Nothing here is imported by `import cascade_fast`: the connector's modules
are the ones one level up.
"""
