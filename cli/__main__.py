from ndonnx_cli.main import main

raise SystemExit(main())
