from rnnd.cli import main

raise SystemExit(main())
