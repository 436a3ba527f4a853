"""Access to an MLflow tracking server: the check made before any work, and MLflow's refusals as user errors.

A server that does not answer, or refuses the credentials in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (MLflow's basic-auth app, mlflow/README.md), and an action the user is not permitted
end as one ``error:`` line (:class:`TrackingAccessError`, exit status 2 through harness/cli.py) instead of a
traceback after minutes of retries. Used by ``harness.ops.tracking`` and ``harness.ops.registry``; imports no other
module of ``harness.ops``, so both can.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from harness.config import ConfigError

# Seconds the pre-flight check waits for an answer: a live server answers it in well under a second.
SERVER_CHECK_TIMEOUT_S = 10.0


class TrackingAccessError(ConfigError):
    """The tracking server does not answer, refuses the user's credentials, or does not permit an action.

    A user error (harness/cli.py prints its one line and exits with status 2): the message names the server,
    the user and what to do."""


def _who() -> str:
    from mlflow.utils.credentials import read_mlflow_creds  # the environment, else ~/.mlflow/credentials

    user = read_mlflow_creds().username
    return f"user '{user}'" if user else "an anonymous client (MLFLOW_TRACKING_USERNAME is not set)"


def _refusal(uri: str, status: int, action: str | None) -> TrackingAccessError:
    if status == 401:
        when = f" while trying to {action}" if action else ""
        return TrackingAccessError(
            f"the tracking server {uri} refused the credentials of {_who()} (HTTP 401){when}: "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on that server")
    return TrackingAccessError(
        f"{_who()} is not permitted to {action} on the tracking server {uri} (HTTP 403, also its answer when the "
        "model or experiment does not exist): check the name, or ask its admin for the permission (mlflow/README.md, "
        "'Users and permissions')")


def check_tracking_server(uri: str, timeout: float = SERVER_CHECK_TIMEOUT_S) -> None:
    """Raise :class:`TrackingAccessError` unless the http(s) server at ``uri`` answers and accepts the credentials.

    One request without retries (a search for one experiment, which any account may make), so a wrong address or
    password fails in seconds instead of after MLflow's retries; other URIs (sqlite, file) are not checked.
    """
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, timeout=timeout, params={"max_results": 1})
    except MlflowException as error:  # no answer: refused, unreachable, timed out
        text = str(getattr(error, "message", error))
        reason = re.search(r"\[Errno -?\d+\] [^\"')\]]+|timed out|Name or service not known", text)
        cause = reason.group(0).strip() if reason else "no answer"
        raise TrackingAccessError(
            f"the tracking server {uri} does not answer ({cause}): start it (mlflow/start_server.sh) or fix "
            "--tracking-uri / track.tracking_uri / MLFLOW_TRACKING_URI") from None
    if response.status_code in (401, 403):
        raise _refusal(uri, response.status_code, None if response.status_code == 401 else "search experiments")
    if response.status_code != 200:
        raise TrackingAccessError(
            f"{uri} answered HTTP {response.status_code} to an MLflow API request: it is not an MLflow tracking "
            "server, or the URI lacks its path prefix; fix --tracking-uri / MLFLOW_TRACKING_URI")


def is_access_error(error: BaseException) -> bool:
    """An MLflow error saying the server refused the credentials (401) or the action (403)."""
    return getattr(error, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED")


@contextmanager
def tracking_errors(uri: str | None, action: str) -> Iterator[None]:
    """Turn MLflow's 401 / 403 errors raised inside into one-line :class:`TrackingAccessError` naming ``action``."""
    try:
        yield
    except Exception as error:
        if not is_access_error(error):
            raise
        status = 401 if getattr(error, "error_code", None) == "UNAUTHENTICATED" else 403
        raise _refusal(uri or "(default)", status, action) from None
