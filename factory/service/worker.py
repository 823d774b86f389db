"""A service job's Ray driver: `python -m factory.service.worker SPEC.json`, run by the Ray Jobs API.

SPEC.json (written by the service at submit) holds the resolved job tables and the roots
they were confined to. The worker checks the confinement again (a path component swapped for
a symlink after submit is refused), joins the cluster it runs on (Ray sets RAY_ADDRESS for a
job's driver) and runs the job exactly as `specmill factory run` does: resumable, exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("specmill.service.worker")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from factory.job import JobConfigError, load_job
    from factory.pipeline import FactoryError, run_job
    from factory.service.settings import ApiToken, ServiceSettings
    from factory.service.specs import SpecError, check_confined, flatten

    (spec_path,) = argv
    spec = json.loads(Path(spec_path).read_text())
    roots = spec["roots"]
    # Confinement needs only the roots; a placeholder principal satisfies the settings' checks.
    settings = ServiceSettings(data_root=roots["data_root"], input_roots=roots["input_roots"],
                               tokens=(ApiToken(name="worker", token="x" * 32),))
    overrides = flatten(spec["job"])
    overrides["ray.address"] = os.environ.get("RAY_ADDRESS", "auto")
    try:
        check_confined(spec["job"], settings)
        job = load_job(None, overrides)
        report = run_job(job, show_progress=False)
    except (SpecError, JobConfigError, FactoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
