from genframe.cli import main

raise SystemExit(main())
