def pytest_configure(config):
    config.addinivalue_line("markers", "xpu: needs an Intel GPU with an XPU build of torch")
