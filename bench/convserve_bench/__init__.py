"""``convserve-bench``, a development tool: load a convserve server beside its reference servers and ceilings.

Modules, one job each:
  * :mod:`convserve_bench.processes`: server processes on loopback (shared with the tests) and their CPU and memory;
  * :mod:`convserve_bench.rpc`: what the served model takes, and the requests the load and the tests send;
  * :mod:`convserve_bench.servers`: the two reference servers, do-nothing and naive;
  * :mod:`convserve_bench.inprocess`: single-threaded ONNX Runtime timed in this process;
  * :mod:`convserve_bench.loadgen`: the closed-loop load generator;
  * :mod:`convserve_bench.rounds`: one step's rounds, alternating between the servers;
  * :mod:`convserve_bench.ceilings`: the composite ceiling, the ratios to it and the targets;
  * :mod:`convserve_bench.report`: the Markdown report and the plot;
  * :mod:`convserve_bench.cli`: the command line.
"""
