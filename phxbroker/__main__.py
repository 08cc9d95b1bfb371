from phxbroker.cli.main import main

main()
