from covidscan.cli import main

raise SystemExit(main())
