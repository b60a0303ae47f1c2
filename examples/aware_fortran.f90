! A Fortran program that checkpoints itself between iterations (the program API, docs/aware.md), through the C
! library with ISO_C_BINDING:
!   python -m hpcckpt.aware.build lib && gfortran -o aware_f examples/aware_fortran.f90 -Llib -lhpcckpt_aware -Wl,-rpath,$PWD/lib
!   dmtcp_launch ./aware_f
program aware_fortran
  use iso_c_binding
  implicit none
  interface
    integer(c_int) function hpcckpt_is_enabled() bind(c, name="hpcckpt_is_enabled")
      import :: c_int
    end function
    integer(c_int) function hpcckpt_checkpoint() bind(c, name="hpcckpt_checkpoint")
      import :: c_int
    end function
  end interface
  integer :: iter, k, rc
  real(8) :: x = 0d0
  do iter = 1, 100
    x = x + sum([(1d0 / (iter + k), k = 1, 100000)])
    if (mod(iter, 25) == 0 .and. hpcckpt_is_enabled() == 1) then
      rc = hpcckpt_checkpoint()
      if (rc == 1) print *, 'checkpoint written at iteration', iter
      if (rc == 2) print *, 'restarted from the checkpoint of iteration', iter
    end if
  end do
  print *, 'x =', x
end program aware_fortran
