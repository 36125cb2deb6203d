"""common/cli.py: every module's user error is one line and exit 2, a bug is a traceback."""

import pytest

from common import cli
from common.demo import DemoError
from common.errors import UserError
from common.filters import FilterError
from common.gradcam import GradCAMError
from common.metrics import MetricsError, domain_probe
from common.models import ModelError, WeightsError
from common.slide_io import SlideError
from common.stain import StainError

MODULE_ERRORS = [UserError, FilterError, GradCAMError, MetricsError, ModelError, WeightsError, SlideError,
                 StainError, DemoError]


@pytest.mark.parametrize("error", MODULE_ERRORS, ids=lambda e: e.__name__)
def test_each_module_error_is_one_line_and_exit_2(error, capsys):
    def main(argv):
        raise error("first line\nsecond line")

    assert issubclass(error, UserError)
    assert cli.run(main, []) == 2
    assert capsys.readouterr().err == "error: first line\n"


def test_a_real_module_error_through_run(capsys):
    import numpy as np

    def main(argv):  # the domain probe's "too few rows" (it escaped as a traceback before)
        domain_probe(np.zeros((3, 2)), np.array(["a", "b", "a"]), seed=0)

    assert cli.run(main, []) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_bug_is_not_swallowed():
    def main(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        cli.run(main, [])
