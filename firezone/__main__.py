from firezone.cli.main import main

main()
