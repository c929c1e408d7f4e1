# Allocation-count test (issue #4): tests/alloc_test.c linked with the
# counting allocator tests/alloc_count.c, run once per backend like the other
# test programs (ctest name alloc_test[<backend>]). Included from
# tests/CMakeLists.txt after zev_test() and ZEV_TEST_BACKENDS are defined.
#
# The counting allocator interposes malloc in the executable (exported with
# -rdynamic so libzmq's and libc's calls resolve to it). A sanitizer runtime
# owns malloc as well, so the test exists only in plain builds.
if(ZEV_SANITIZE STREQUAL "")
  add_executable(alloc_test alloc_test.c alloc_count.c common.c)
  target_include_directories(alloc_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_definitions(alloc_test PRIVATE _GNU_SOURCE)
  target_link_libraries(alloc_test PRIVATE
    zev_static ${ZEV_SHIM_LIB} ${CRITERION_LIB} Threads::Threads ${CMAKE_DL_LIBS})
  target_link_options(alloc_test PRIVATE -rdynamic)
  foreach(be ${ZEV_TEST_BACKENDS})
    add_test(NAME "alloc_test[${be}]" COMMAND alloc_test -j1)
    set_tests_properties("alloc_test[${be}]" PROPERTIES
      ENVIRONMENT "ZEV_BACKEND=${be};ZEV_TEST_BACKEND=${be}" TIMEOUT 900 LABELS "${be}")
  endforeach()
endif()

# Allocation failure at every allocation site of a scripted scenario (issue
# 14): tests/alloc_faults.c with the same allocator's fault injection.
if(ZEV_SANITIZE STREQUAL "")
  add_executable(alloc_faults alloc_faults.c alloc_count.c common.c)
  target_include_directories(alloc_faults PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_definitions(alloc_faults PRIVATE _GNU_SOURCE)
  target_link_libraries(alloc_faults PRIVATE
    zev_static ${ZEV_SHIM_LIB} ${CRITERION_LIB} Threads::Threads ${CMAKE_DL_LIBS})
  target_link_options(alloc_faults PRIVATE -rdynamic)
  foreach(be ${ZEV_TEST_BACKENDS})
    add_test(NAME "alloc_faults[${be}]" COMMAND alloc_faults -j1)
    set_tests_properties("alloc_faults[${be}]" PROPERTIES
      ENVIRONMENT "ZEV_BACKEND=${be};ZEV_TEST_BACKEND=${be}" TIMEOUT 900 LABELS "${be}")
  endforeach()
endif()
