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
