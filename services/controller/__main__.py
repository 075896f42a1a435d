from services.controller.io_loop import main

main()
