"""A library's log of a failure that sspo reports itself: muted when the library is quiet, shown with --verbose."""

import logging

import pytest

from sspo.logs import muted


@pytest.mark.parametrize("library_level, shown", [(logging.ERROR, False), (logging.WARNING, True)], ids=["quiet", "verbose"])
def test_muted_hides_a_quiet_librarys_errors_only(library_level, shown, caplog):
    library = logging.getLogger("sspo-test-library")
    library.setLevel(library_level)
    with muted("sspo-test-library"):
        logging.getLogger("sspo-test-library.loader").error("loading failed")
    library.error("after the block")
    assert [record.getMessage() for record in caplog.records] == ["loading failed"] * shown + ["after the block"]
    assert library.level == library_level


@pytest.mark.parametrize("handler", ["bar-safe", "plain"])
def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(handler):
    import io

    from tqdm import tqdm

    from sspo.logs import BarSafeHandler, UserFormatter

    stream = io.StringIO()
    log = logging.getLogger(f"sspo-test-bar-{handler}")
    log.propagate = False
    log.addHandler((BarSafeHandler if handler == "bar-safe" else logging.StreamHandler)(stream))
    log.handlers[0].setFormatter(UserFormatter())
    with tqdm(total=3, desc="sft", file=stream, ascii=True) as bar:
        bar.update(1)
        log.warning("skipping unreadable row 3")
        bar.update(2)
    lines = [segment.rpartition("\r")[2] for segment in stream.getvalue().split("\n")]
    own_line = f"sspo-test-bar-{handler}: warning: skipping unreadable row 3" in lines
    assert own_line == (handler == "bar-safe")


@pytest.mark.parametrize("verbose, name, level, line", [
    (False, "sspo.training.trainer", logging.INFO, "sspo: sft: 4 optimizer steps"),
    (False, "sspo.training.checkpoints", logging.WARNING, "sspo: warning: sft: 4 optimizer steps"),
    (False, "accelerate", logging.WARNING, "accelerate: warning: sft: 4 optimizer steps"),
    (True, "sspo.training.trainer", logging.INFO, "INFO sspo.training.trainer: sft: 4 optimizer steps"),
])
def test_log_lines_read_as_sspo_speaking_and_name_modules_only_when_verbose(verbose, name, level, line):
    from sspo.logs import UserFormatter

    record = logging.LogRecord(name, level, __file__, 1, "sft: %d optimizer steps", (4,), None)
    assert UserFormatter(verbose).format(record) == line


@pytest.mark.parametrize("verbose, line", [(False, "py.warnings: warning: x.py:1: UserWarning: m"), (True, "WARNING py.warnings: x.py:1: UserWarning: m")])
def test_a_captured_python_warning_ends_its_line_without_a_blank_one(verbose, line):
    from sspo.logs import UserFormatter

    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "%s", ("x.py:1: UserWarning: m\n",), None)  # as logging.captureWarnings logs it
    assert UserFormatter(verbose).format(record) == line
