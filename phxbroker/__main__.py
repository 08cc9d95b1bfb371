from phxbroker.cli import main

main()
