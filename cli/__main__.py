from ndonnx_cli.main import entry

entry()
