"""Breaks the contract on purpose: a hook that raises (as one whose vendor library is missing would)."""

import ktcore


@ktcore.hookimpl
def register_experts_ops(register):
    raise OSError("libexample_vendor.so: cannot open shared object file")
