"""Lower layers never import higher ones: training does not load the benchmark package."""

from __future__ import annotations

import json
import subprocess
import sys


def test_training_and_comparison_do_not_import_the_benchmark_package():
    probe = ("import json, sys; import divco.train, divco.train.comparison, divco.commands._train_options; "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('divco.benchmark', 'divco.commands.')) "
             "and m != 'divco.commands._train_options')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
