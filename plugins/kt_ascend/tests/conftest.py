def pytest_configure(config):
    config.addinivalue_line("markers", "npu: needs an Ascend NPU with torch_npu")
