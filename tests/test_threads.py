"""The configured torch thread count holds for every test, whatever the test before it set."""

import os

import torch

CONFIGURED = int(os.environ.get("TSCRAY_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"))


def test_a_test_may_change_the_thread_count():
    torch.set_num_threads(CONFIGURED + 1)
    assert torch.get_num_threads() == CONFIGURED + 1


def test_the_next_test_gets_the_configured_count_back():
    assert torch.get_num_threads() == CONFIGURED
