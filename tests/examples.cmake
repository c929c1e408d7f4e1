# The example programs as tests: each runs once per backend like the test
# programs (ctest name example_<name>[<backend>], ZEV_BACKEND set), and
# tests/check_example.py checks the summary lines it prints against what
# the example claims (every tick to the fast subscribers, every frame
# exactly once, messages both ways in a host loop, ...). Included from
# tests/CMakeLists.txt after ZEV_TEST_BACKENDS is defined; the targets
# themselves are made in examples/CMakeLists.txt.
if(NOT Python3_Interpreter_FOUND)
  message(STATUS "python3 not found: the examples are built but not run as tests")
  return()
endif()

# zev_example_test(<example> <checker args> -- <program args>)
function(zev_example_test ex)
  cmake_parse_arguments(PARSE_ARGV 1 E "" "" "CHECK;ARGS")
  foreach(be ${ZEV_TEST_BACKENDS})
    add_test(NAME "example_${ex}[${be}]"
      COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/check_example.py ${ex}
              --sanitizer=${ZEV_SANITIZE} ${E_CHECK} -- $<TARGET_FILE:example_${ex}> ${E_ARGS})
    set_tests_properties("example_${ex}[${be}]" PROPERTIES
      ENVIRONMENT "ZEV_BACKEND=${be}" TIMEOUT 300 LABELS "${be};example")
  endforeach()
endfunction()

# 3 s: the memory is sampled from 0.75 s on, over 22,500 ticks.
zev_example_test(marketdata CHECK --seconds=3 ARGS 3)
zev_example_test(collector CHECK --frames=2000 ARGS 2000)
zev_example_test(gateway ARGS 200 20)
zev_example_test(fiber_echo CHECK --count=20 ARGS inproc://fiber-echo 20)
zev_example_test(fiber_router CHECK --clients=8 --requests=50 ARGS 8 50)
if(ZEV_HAVE_LIBUV)
  zev_example_test(embed_libuv)
endif()
if(ZEV_HAVE_LIBEV)
  zev_example_test(embed_libev)
endif()

# The small ones say it themselves.
foreach(be ${ZEV_TEST_BACKENDS})
  add_test(NAME "example_echo[${be}]" COMMAND example_echo inproc://echo 5)
  add_test(NAME "example_router[${be}]" COMMAND example_router 4 1000)
  set_tests_properties("example_echo[${be}]" PROPERTIES
    PASS_REGULAR_EXPRESSION "reply: ping 4\n")
  set_tests_properties("example_router[${be}]" PROPERTIES
    PASS_REGULAR_EXPRESSION "replies 4000 of 4000, failed sends 0")
  set_tests_properties("example_echo[${be}]" "example_router[${be}]" PROPERTIES
    ENVIRONMENT "ZEV_BACKEND=${be}" TIMEOUT 60 LABELS "${be};example")
endforeach()
