"""The host suite's FileVault check (tests/host/test_macos.py), run here
against a stand-in for testinfra's host: no Mac exists here, so `fdesetup
status` cannot run for real. The stand-in answers `run()` only; the check's
own logic (warn when On, fail when route.json is stale) is what is tested."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.host.test_macos import FileVaultOn, test_filevault_is_reported as check


def mac_saying(stdout: str, rc: int = 0):
    return SimpleNamespace(run=lambda command: SimpleNamespace(
        rc=rc if command == "fdesetup status" else 127, stdout=stdout, stderr=""))


def test_filevault_off_as_recorded_passes_quietly(recwarn):
    check(mac_saying("FileVault is Off.\n"),
          {"filevault": {"on": False, "status": "FileVault is Off."}})
    assert not [w for w in recwarn if issubclass(w.category, FileVaultOn)]


def test_filevault_on_is_a_warning_that_names_authrestart():
    with pytest.warns(FileVaultOn, match=r"sudo fdesetup authrestart"):
        check(mac_saying("FileVault is On.\n"),
              {"filevault": {"on": True, "status": "FileVault is On."}})


def test_filevault_turned_on_since_the_deploy_fails_the_check():
    with pytest.raises(AssertionError, match="run the deploy again"):
        check(mac_saying("FileVault is Off, but will be enabled after the next restart.\n"),
              {"filevault": {"on": False, "status": "FileVault is Off."}})
    with pytest.raises(AssertionError, match="records no FileVault state"):
        check(mac_saying("FileVault is Off.\n"), {})
