import sys

if len(sys.argv) > 1 and sys.argv[1] == "score":  # model-free subcommand, not a LightningCLI stage
    from qgen.score import main as score_main

    sys.exit(score_main(sys.argv[2:]))

from qgen.cli import main  # noqa: E402

main()
