from slope_bench.analysis import main

raise SystemExit(main())
