"""`cascade-fast bench`: the fleet benchmark of the python and fast connectors.

One module per job:

- `broker`: start mosquitto (or amqtt) on a free loopback port, or name an existing broker;
- `fleet`: the simulated Cascade fleet, publisher and observer processes;
- `measure`: sequence tracking, latency, CPU and memory, aggregation;
- `runner`: one run per connector (and a paced one), progress, Ctrl-C, teardown;
- `report` and `plot`: the table, the JSON document and the chart;
- `command`: the command-line glue (`cascade_fast.apps.cli` dispatches to it);
- `simulate`: a small fleet to point `cascade-fast watch` at;
- `deps`: optional dependencies, with the extra that brings them.

Nothing here is imported by `import cascade_fast`; rich, matplotlib and
psutil (``pip install 'cascade-fast[bench]'``) only when a command runs.
"""
