from infinitekv.cli import main

main()
