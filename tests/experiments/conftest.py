import pytest


@pytest.fixture(autouse=True)
def _no_committed_results(tmp_path_factory, monkeypatch):
    """The harness's tests run on tiny corpora of their own: the committed results under docs/science (measured
    on the science corpus) must not make the corpus check refuse them, in this process or a launched one."""
    from experiments.science import common

    published = str(tmp_path_factory.mktemp("published"))
    monkeypatch.setenv("MOLM_DS_SCIENCE_RESULTS", published)
    monkeypatch.setattr(common, "PUBLISHED", published)
