"""Token authentication for the Ray clusters specmill starts itself.

Ray (2.5x+) turns token authentication on for a new cluster and looks for the token in
RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then `~/.ray/auth_token`. A
`ray start --head` finds none on a machine that never ran Ray and exits; `ray.init()` writes
one into the home directory. Either way a first run depends on what the home directory
holds. So every cluster specmill starts gets a token of specmill's own, in a file of mode
0600 beside the cluster's other state, handed to the cluster (and so to its job drivers
and workers) and to specmill's own clients through RAY_AUTH_TOKEN_PATH. A user's
`~/.ray/auth_token` is never read, written or weakened; attaching to a user's cluster
(an address) uses that cluster's auth unchanged and does not come through here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

TOKEN_FILE = "ray-auth-token"
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def own_token(state_dir: Path) -> Path:
    """The token file of the cluster whose state lives in `state_dir`, made once (mode 0600)
    and kept, so that a restarted service finds its running cluster with the same token."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if not path.read_text().strip():
            raise RuntimeError(f"{path} is empty; remove it so that specmill makes a new Ray token") from None
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, the size of Ray's own tokens
    return path


def cluster_env(token_path: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) set to authenticate with `token_path`
    only: a RAY_AUTH_TOKEN inherited from the user's shell would take precedence over the file."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "RAY_AUTH_TOKEN"}
    return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


@contextlib.contextmanager
def token_in_process(token_path: Path) -> Iterator[None]:
    """Within the block, this process's Ray calls authenticate with `token_path`; afterwards
    the auth variables are as they were."""
    before = {k: os.environ.get(k) for k in _AUTH_VARS}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
    _reload_ray_auth()
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_ray_auth()


def _reload_ray_auth() -> None:
    # Ray reads the auth mode and the token once per process and caches both (in its C++
    # config and token loader); without a reload, a second cluster in the same process (a
    # second job, a test) would be sent the first one's token and be refused. Ray has no
    # public call for this; these are the two it makes itself after writing a new token.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
