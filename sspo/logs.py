"""How sspo's output looks: its own log lines and bars, with the libraries' chatter only under --verbose."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_FORMAT = "%(levelname)s %(name)s: %(message)s"


class UserFormatter(logging.Formatter):
    """``sspo: message`` (``sspo: warning: message``), as the one-line errors read; a library's
    record keeps its logger's name. With ``verbose``, every record shows its level and module."""

    def __init__(self, verbose: bool = False):
        super().__init__(VERBOSE_FORMAT)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record).rstrip()  # a warning captured from `warnings` ends in a newline
        source = "sspo" if record.name == "sspo" or record.name.startswith("sspo.") else record.name
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{source}: {level}{record.getMessage().rstrip()}"
        return f"{text}\n{self.formatException(record.exc_info)}" if record.exc_info else text


class BarSafeHandler(logging.StreamHandler):
    """Writes each record on lines of its own above a progress bar, not into the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: a failed emit is reported, never raised
            self.handleError(record)


def set_up_logging(verbose: bool, level: int | None = None) -> None:
    """The CLI's logging (INFO, DEBUG with ``verbose``; or ``level``) and :func:`quiet_libraries`."""
    handler = BarSafeHandler()
    handler.setFormatter(UserFormatter(verbose))
    logging.basicConfig(level=level or (logging.DEBUG if verbose else logging.INFO), handlers=[handler])
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.disable_propagation()  # huggingface_hub prints its records itself: through the root too, each came twice
    quiet_libraries(not verbose)


def quiet_libraries(quiet: bool) -> None:
    """Without --verbose, the libraries' notices and progress bars give way to sspo's own output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Every pipeline load draws "Loading pipeline components" / "Loading weights" bars, dozens per
    # run; sspo's own bars (one per phase) and summaries stay.
    for library in (diffusers_logging, transformers_logging):
        if quiet:
            library.disable_progress_bar()
        else:
            library.enable_progress_bar()
    if not quiet:
        return
    for name in ("diffusers", "transformers", "accelerate", "matplotlib", "peft"):  # per-call notices (safety checker, state files)
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()  # e.g. the torchvision fallback notice on every run
    warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers passes it to huggingface_hub, which ignores it, on every offline load


@contextmanager
def muted(logger_name: str) -> Iterator[None]:
    """No records of logger ``logger_name`` (and its children) within the block, unless --verbose let
    it talk (its level below ERROR): for a library call that logs its failure before raising it,
    when sspo turns the exception into its one error line."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    if logger.getEffectiveLevel() >= logging.ERROR:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)
