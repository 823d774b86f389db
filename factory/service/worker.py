"""A service job's Ray driver: `python -m factory.service.worker SPEC.json`, run by the Ray Jobs API.

SPEC.json (written by the service at submit) holds the resolved job tables and the roots
they were confined to. The worker checks the confinement again (a path component swapped for
a symlink after submit is refused), joins the cluster it runs on (Ray sets RAY_ADDRESS for a
job's driver) and runs the job as `specmill factory run` does (resumable, exactly once), but
with the media paths inside its rows confined to the same roots (`specs.media_paths`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from factory.inputs import MediaPaths
    from factory.job import JobConfig

log = logging.getLogger("specmill.service.worker")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from factory.job import JobConfigError
    from factory.pipeline import FactoryError, run_job
    from factory.service.specs import SpecError

    (spec_path,) = argv
    try:
        job, media = load_spec(Path(spec_path))
        report = run_job(job, media=media, show_progress=False)
    except (SpecError, JobConfigError, FactoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


def load_spec(spec_path: Path) -> tuple[JobConfig, MediaPaths]:
    """The job SPEC.json describes, its confinement checked again, and the media paths its rows
    may name (inside the same roots as its inputs)."""
    from factory.job import load_job
    from factory.service.settings import ApiToken, ServiceSettings
    from factory.service.specs import check_confined, flatten, media_paths

    spec = json.loads(spec_path.read_text())
    roots = spec["roots"]
    # Confinement needs only the roots; a placeholder principal satisfies the settings' checks.
    settings = ServiceSettings(data_root=roots["data_root"], input_roots=roots["input_roots"],
                               tokens=(ApiToken(name="worker", token="x" * 32),))
    overrides = flatten(spec["job"])
    overrides["ray.address"] = os.environ.get("RAY_ADDRESS", "auto")
    check_confined(spec["job"], settings)
    return load_job(None, overrides), media_paths(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
