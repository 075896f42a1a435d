from services.controller.server import main

main()
