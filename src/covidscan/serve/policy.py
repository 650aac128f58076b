"""Who may reach the service: a host beyond this machine needs a token; a token-less local service answers
only requests that name it by a local Host (DNS rebinding). The CLI applies this before starting uvicorn."""

from __future__ import annotations

from covidscan.errors import CLIError
from covidscan.serve.middleware import LOCAL_HOSTS

LOCAL_BINDS = ("127.0.0.1", "localhost", "::1")


def check_exposure(host: str, token: str | None) -> tuple[str, ...] | None:
    """The Host names the app should accept (None: any, the token guards it).

    Raises:
        CLIError: ``host`` is reachable from other machines and no token is set.
    """
    if host not in LOCAL_BINDS and not token:
        raise CLIError(
            f"--host {host} makes the service reachable from other machines: set a token "
            "(--token TOKEN or COVIDSCAN_TOKEN) so that only holders of it can use it"
        )
    return None if token else LOCAL_HOSTS


def check_limits(*, max_upload_mb: int, max_study_mb: int, max_pending: int) -> None:
    """Raises:
    CLIError: a limit that would refuse every request."""
    if max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb {max_upload_mb}: must be a positive number of megabytes")
    if max_study_mb <= 0:
        raise CLIError(f"--max-study-mb {max_study_mb}: must be a positive number of megabytes")
    if max_pending < 1:
        raise CLIError(f"--max-pending {max_pending}: at least 1 (with fewer every prediction would be refused)")


def pending_within_budget(max_pending: int, memory_budget_mb: int | None, *, studies: bool) -> tuple[int, str]:
    """``max_pending`` lowered so that that many decodes at once fit the memory budget (``memory_budget_mb``, else
    half of this machine's memory); returns it and a line saying what was decided.

    Raises:
        CLIError: the budget holds not even one prediction.
    """
    from covidscan.data.budget import MIB, PEAK_FACTOR, admissible_pending, image_budget, machine_memory, study_budget

    budget = memory_budget_mb * MIB if memory_budget_mb else machine_memory() // 2
    if budget <= 0:
        return max_pending, "memory budget unknown (machine memory not readable): --max-pending as given"
    per = PEAK_FACTOR * (study_budget() if studies else image_budget())
    fits = admissible_pending(budget, studies=studies)
    if fits < 1:
        raise CLIError(
            f"--memory-budget {budget // MIB} MiB holds no prediction ({per // MIB} MiB each at the decode budget); raise it, "
            "or lower COVIDSCAN_MAX_IMAGE_MB / COVIDSCAN_MAX_STUDY_MB"
        )
    chosen = min(max_pending, fits)
    return chosen, (
        f"memory budget {budget // MIB} MiB / {per // MIB} MiB per prediction: {chosen} at once"
        + (f" (--max-pending {max_pending} lowered)" if chosen < max_pending else "")
    )
