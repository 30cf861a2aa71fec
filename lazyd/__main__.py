from lazyd.cli import main

raise SystemExit(main())
