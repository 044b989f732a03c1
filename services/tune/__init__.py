"""``mtkd tune``: a hyper-parameter search with Ray Tune over one shared teacher pool.

The driver joins (or starts) Ray, starts the teacher actors once, and runs every trial against
them: a trial is a Tune function trainable that builds its experiment (the base plus its sampled
values) and trains it with :class:`mtkd.engine.Distiller`, the agent in-process. After every epoch
it reports scalar metrics and a checkpoint, so that ASHA can stop it and an interrupted search
continues it (``--resume``). At the end the driver prints a table, writes ``results.jsonl`` and
``best_config.yaml`` into the search folder and returns a summary.

The package, by job (the ``mtkd tune`` command line is in :mod:`services.cli`):

* :mod:`services.tune.spec`: the tune file, its settings and its checks (no Ray);
* :mod:`services.tune.trial`: one trial (the Tune function trainable);
* :mod:`services.tune.driver`: :func:`~services.tune.driver.run_tune`, the ``Tuner`` and its
  progress callback;
* :mod:`services.tune.results`: the rows, the table, ``results.jsonl`` and ``best_config.yaml``.

Importing this package imports no Ray: the names below are the tune file's;
``run_tune`` is in :mod:`services.tune.driver`.
"""
from services.tune.spec import (BEST_CONFIG_FILE, RESULTS_FILE, SEARCH_FILE, Sampler, TuneSettings, TuneSpec,
                                 load_saved_search, load_tune, parse_tune, trial_config)

__all__ = ["BEST_CONFIG_FILE", "RESULTS_FILE", "SEARCH_FILE", "Sampler", "TuneSettings", "TuneSpec",
           "load_saved_search", "load_tune", "parse_tune", "trial_config"]
