"""What the ``bench_*.py`` scripts share besides the thing each measures, one concern a module.

From the bottom up (a module imports only those above it in this list):

- :mod:`harness.measure`: ``/proc/<pid>/status`` (``proc_status``, ``MemoryProbe``), wall and CPU
  laps (``Stopwatch``), the machine's busy CPU time, ``/proc/meminfo``, the load average;
- :mod:`harness.pagecache`: warming, reading, evicting and counting files in the page cache;
- :mod:`harness.reporting`: the markdown table, the environment, aggregation of repeated runs,
  the memory bound and its verdicts, ratios, error lines;
- :mod:`harness.processes`: one case per fresh interpreter (``run_case``, ``run_case_sampled``,
  ``run_repeated``) and the result file a child writes;
- :mod:`harness.models`: the deterministic Mistral-3 and Qwen3 models, their sizes and digests;
- :mod:`harness.checkpoints`: writing or reusing their checkpoints, facts read from the files,
  the reference dequantized state;
- :mod:`harness.child`: the child side of a load case (the imports before its baseline, the
  measured run, its result fields);
- :mod:`harness.cli`: the command line, entry point, work directory and end of a run.

Scripts put their own directory on ``sys.path`` and import the modules they use
(``from harness import cli, reporting``). Every module keeps torch, transformers and lazyfp8
imports inside functions: a child case decides itself what it has imported before it reads its
baseline.
"""
